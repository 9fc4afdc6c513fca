"""Domain packs: professional vocabularies with templates that generate synthetic training corpora.

    pack = resolve_domain("finance")          # or a user domain, or "path/to/domain.yaml"
    corpus = generate_corpus(pack, seed=0)    # raw + instruction data, held-out splits, long tail
"""
from dsft.domains.catalog import (
    builtin_pack,
    data_records,
    general_pack,
    list_domains,
    new_domain,
    resolve_domain,
    user_domains_dir,
    validate_domain_name,
)
from dsft.domains.generate import DomainCorpus, corpus_text_for_tokenizer, generate_corpus
from dsft.domains.pack import DomainPack, InstructionTemplate, load_pack, parse_pack

__all__ = [
    "DomainCorpus",
    "DomainPack",
    "InstructionTemplate",
    "builtin_pack",
    "data_records",
    "corpus_text_for_tokenizer",
    "general_pack",
    "generate_corpus",
    "list_domains",
    "load_pack",
    "new_domain",
    "parse_pack",
    "resolve_domain",
    "user_domains_dir",
    "validate_domain_name",
]
