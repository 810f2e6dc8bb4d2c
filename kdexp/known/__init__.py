"""Settings where the answer is known exactly, to check the field's claims and kdexp's
implementations against the truth (:mod:`kdexp.known.distributions`)."""
