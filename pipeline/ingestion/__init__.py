"""Site ingestion: a hospital's source images to its identifier-free training cache.

:mod:`.readers` and :mod:`.codestream` read headers and pixels of hostile files safely,
:mod:`.acceptance` decides from the header, :mod:`.pseudonym` keys patients and images,
:mod:`.splits` splits by patient and :mod:`.preprocess` runs the stages for one site."""
