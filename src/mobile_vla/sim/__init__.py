"""MuJoCo simulator of the Mobile-VLA task: arena, scenarios, scripted expert, collection.

Importing :mod:`mobile_vla.sim.env` chooses a headless GL backend (EGL, else OSMesa) first.
"""
