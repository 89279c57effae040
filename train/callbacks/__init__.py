"""Lightning callbacks: previews and export, EMA, console, preemption, data health, guards."""
