"""Training a small BLIP-2 from scratch, in BLIP-2's stages: a frozen image encoder, the stage-1
Q-Former (ITC, ITM, ITG), a frozen language model, and the stage-2 Q-Former feeding it."""
