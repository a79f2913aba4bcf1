"""How the app is deployed and shared: server settings, the cap on heavy jobs, the view in a URL."""
