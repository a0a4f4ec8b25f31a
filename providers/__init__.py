"""Where machines come from: provider protocol, capability profiles, pools, dispatch, lifecycle."""
