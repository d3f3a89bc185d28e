"""Pure deciders, one module per aggregate. Imports nothing from the rest of orderstream."""
