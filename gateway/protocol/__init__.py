"""Wire types: pydantic and the standard library only, no engine imports."""
