# %% [markdown]
# # Placeholder

# %%
print("placeholder")
