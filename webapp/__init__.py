"""pneumoscope web app."""
