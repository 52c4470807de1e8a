"""Pure array functions: the gated linear attention engine and exact window attention."""
