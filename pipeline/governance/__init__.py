"""Data governance at a site: who approved which job, what the site has done, with its own key."""
