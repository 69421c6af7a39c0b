"""The front door: the Flask app, its routes and their schemas. Views validate, call one use
case of the core (shoal/use_cases/) and render; they never import workers/."""
