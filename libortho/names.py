"""The built-in name and word lists that synthetic records draw from: the scenario's private
records and the look-alike templates fill their names and words from these same lists.

Changing a list changes every seeded record built from it (and the scenario cache keys' meaning).
"""
FIRST_NAMES = (
    "Maria", "James", "Aisha", "Chen", "Olga", "Pedro", "Fatima", "Lukas", "Priya", "Tomas",
    "Ingrid", "Kwame", "Sofia", "Dmitri", "Hannah", "Rafael", "Yuki", "Amara", "Henrik", "Leila",
    "Mateo", "Nadia", "Oscar", "Ruth", "Samir", "Tessa", "Victor", "Wen", "Zara", "Bruno",
    "Clara", "Diego", "Elena", "Farid", "Greta", "Ivan", "Jana", "Karim", "Lena", "Milan",
)
LAST_NAMES = (
    "Keller", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Fischer", "Rossi", "Sato",
    "Kowalski", "Mensah", "Petrov", "Garcia", "Nguyen", "Schmidt", "Costa", "Jansen", "Ibrahim", "Larsen",
    "Dubois", "Horvat", "Varga", "Brennan", "Castillo", "Weber", "Yilmaz", "Andersen", "Bauer", "Silva",
    "Romero", "Kaur", "Popescu", "Eriksson", "Morales", "Virtanen", "Abbasi", "Kim", "Lopez", "Walsh",
)
ADJECTIVES = (
    "amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly",
    "keen", "lunar", "misty", "noble", "olive", "polar", "quiet", "rapid", "silent", "tidal",
    "urban", "vivid", "wild", "young", "zesty", "bold", "crimson", "dawn", "ember", "fable",
)
NOUNS = (
    "falcon", "harbor", "lantern", "meadow", "nebula", "orchid", "pebble", "quartz", "raven", "summit",
    "tundra", "valley", "willow", "beacon", "canyon", "delta", "ember", "fjord", "glacier", "heron",
    "island", "jasper", "kernel", "ledger", "mosaic", "nimbus", "otter", "prism", "ripple", "sparrow",
)
