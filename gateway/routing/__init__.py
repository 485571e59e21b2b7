"""Pure routing decisions: no Ray, no HTTP."""
