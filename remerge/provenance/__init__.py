"""What explains a merged model: model cards, provenance records, audits of published merges."""
