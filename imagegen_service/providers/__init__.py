"""Provider adapters: one file per upstream, all behind ``base.Provider``."""
