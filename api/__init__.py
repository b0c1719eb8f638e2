"""The edge: the command line and (later) HTTP. The only place that prints or picks exit codes."""
