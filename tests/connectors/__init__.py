"""Tests of the connectors package, one module per connectors module."""
