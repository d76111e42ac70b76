"""The device side: what runs on a device (:mod:`.support`, shipped, never imported by the build), and the
commands that stand in for one on this machine: ``run`` (:mod:`.run`), ``watch`` (:mod:`.watch`) and the project
stream they serve (:mod:`.stream`)."""
