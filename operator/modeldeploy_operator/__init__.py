"""modeldeploy operator: ModelDeployment spec, rendering, status and the kopf handlers."""
