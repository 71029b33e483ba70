"""Small, composable image transforms (DICOM pixel semantics, resizing, augmentation)."""
