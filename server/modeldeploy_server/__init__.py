"""modeldeploy inference server and router (data plane)."""
