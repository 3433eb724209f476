"""Report pages and plots (one module per page)."""
