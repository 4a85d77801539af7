"""What a run reads: its profiles, its roster (a file, a URL, or rows given inline) and the
brand its emails show. A whole run's inputs are checked together in `onboarding.batch.run_request`;
files are read safely by `onboarding.files`, settings by `onboarding.settings`."""
