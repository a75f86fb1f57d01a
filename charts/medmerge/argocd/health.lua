-- Argo CD health of a medmerge.io MergeJob. Install as
-- resource.customizations.health.medmerge.io_MergeJob in argocd-cm (see the chart's README).
-- Succeeded -> Healthy, Failed -> Degraded, Suspended -> Suspended, anything else -> Progressing.
-- A status the operator wrote for an older generation says nothing about the current spec.
local hs = { status = "Progressing", message = "Waiting for the medmerge operator" }
local status = obj.status
if status == nil or status.phase == nil then
  return hs
end
local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the medmerge operator to observe generation " .. tostring(generation)
  return hs
end

local function condition_message(kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind and c.status == "True" and c.message ~= nil and c.message ~= "" then
      return c.message
    end
  end
  return nil
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  if status.results ~= nil and status.results.accuracy ~= nil then
    hs.message = string.format("Succeeded: merged model accuracy %.1f %%", 100 * status.results.accuracy)
  else
    hs.message = "Succeeded"
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = condition_message("Failed") or "Failed"
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended"
else
  local progress = condition_message("Progressing")
  hs.message = phase .. (status.shardsReady ~= nil and (" (" .. status.shardsReady .. " shards ready)") or "")
  if progress ~= nil then
    hs.message = hs.message .. ": " .. progress
  end
end
return hs
