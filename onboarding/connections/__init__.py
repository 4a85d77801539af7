"""A tenant's connection: durable connect links, their settings and the recorded connection."""
