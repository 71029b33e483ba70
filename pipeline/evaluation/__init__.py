"""Evaluation of a released model: its operating threshold (:mod:`.threshold`), test scores
(:mod:`.scoring`), the centralised baseline (:mod:`.baseline`), what the model is
(:mod:`.provenance`), the clinicians' report (:mod:`.clinical`), the privacy audit
(:mod:`.audit`) and the model card (:mod:`.model_card`), the pages drawn by one renderer
(:mod:`.render`)."""
