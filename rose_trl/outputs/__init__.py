"""What a selection writes: the selection folder (`selection`), the per-pair contributions and `rose-trl explain`
(`explain`), the HTML report (`report`, `report_figures`) and the Hub dataset push (`hub`)."""
