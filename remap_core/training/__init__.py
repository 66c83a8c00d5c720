"""End-to-end training: triplet loss, hard-negative mining, the loop."""
