"""Versori's API: the client, its wire models and the returned authorize URL's checks."""
