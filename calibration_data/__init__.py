"""Named calibration recipes (`--calib NAME`): one JSON file per name, read by llmquant.calibration."""
