"""Folding BatchNorm in eager ``nn.Module`` trees: data flow, layer semantics, module state."""
