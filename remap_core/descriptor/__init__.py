"""The descriptor: `backbones` (trunks with feature taps), `regions` (the R-MAC region grid),
`pooling` (the maths as functions: mac, spoc, gem, rmac, l2n), `heads` (the nn.Modules MAC,
SPoC, GeM, R-MAC, REMAP around them), `model` (RetrievalNet and build_model, its config),
`batching` (images batched by shape), `checkpoint` (save/load with config and fingerprint)."""
