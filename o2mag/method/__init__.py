"""The method around the UNet: grafting settings (:mod:`.config`), the batch order (:mod:`.layout`),
DDIM inversion (:mod:`.inversion`) and AGO (:mod:`.ago`)."""
