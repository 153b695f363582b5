"""Config schema, registration and composition."""
