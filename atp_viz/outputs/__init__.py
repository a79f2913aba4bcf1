"""What leaves the app: figure and table exports, the offline HTML report."""
