"""`python -m dreambooth_operator`: placeholder until the controller lands."""
