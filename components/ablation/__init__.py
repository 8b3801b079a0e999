"""Architecture ablations: the cells of a component grid, sized to one budget (see `cells`)."""
