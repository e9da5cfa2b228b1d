"""``spendgate demo``: a runaway agent, the real proxy, the guard holding it — offline."""
