"""The descriptor: backbones with feature taps, the R-MAC region grid, pooling maths, heads (MAC, SPoC, GeM, R-MAC, REMAP), the model, checkpoints."""
