"""Running a flow in this process (`onboard run`, `remind`, the benchmark): interrupts, the
temporary server's catch-up at the end."""
