"""The ModelDeployment CRD as package data, so installed code reads the same schema as the cluster."""
