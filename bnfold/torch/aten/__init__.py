"""ATen graphs: op tables, where constants are stored, and the graph adapter."""
