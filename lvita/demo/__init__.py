"""The built-in demo: synthetic data and the four-stage run (`lvita demo`)."""
