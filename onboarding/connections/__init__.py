"""A tenant's connection: durable connect links and the recorded connection (their settings,
ONBOARD_CONNECT_*, are a section of the settings root, `onboarding.settings`)."""
