"""Methods, one per file; importing this package registers the built-ins."""

from plrm.methods import (  # noqa: F401
    bt,
    conditional,
    further_ft,
    genarm,
    gpo,
    individual,
    lore,
    lore_alt,
    mpu,
    mrm,
    pal,
    pdpo,
    pref,
    prm,
    rag_judge,
    rm_v2,
    similar_user,
    vpl,
)
