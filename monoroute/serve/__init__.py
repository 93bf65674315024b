"""`monoroute serve`: the unit browser (app.py: the JSON API and page; live.py: the live prompt)."""
