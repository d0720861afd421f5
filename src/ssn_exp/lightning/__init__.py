"""Layer 2: Lightning modules, data modules and callbacks (training objectives; certification as a callback)."""
