"""The fleet control plane: enrollment and host identity, inventory, alerts, compliance,
rollouts, the REST API and the web dashboard (``cerulean fleet serve``)."""
