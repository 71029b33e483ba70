"""Evaluation of a released model: test scores (:mod:`.scoring`), the centralised baseline
(:mod:`.baseline`), the clinicians' report (:mod:`.clinical`) and the privacy audit
(:mod:`.audit`), both pages drawn by one renderer (:mod:`.render`)."""
