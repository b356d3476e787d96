"""The ModelDeployment CRD as package data: installed code reads the schema the cluster reads."""
