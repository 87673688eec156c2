-- Forward chest radiographs to the pneumoscope gateway as they arrive in Orthanc: CR or DX, body part CHEST or
-- not given. The gateway's own results (SR, OT, DOC) are never CR or DX, so nothing comes back round.
-- Orthanc's job engine retries a failed send; the gateway acknowledges a film it has seen before, so a second
-- send gives no second result.
function OnStoredInstance(instanceId, tags, metadata)
  local modality = tags['Modality'] or ''
  local bodyPart = string.upper(tags['BodyPartExamined'] or '')
  if (modality == 'CR' or modality == 'DX') and (bodyPart == '' or bodyPart == 'CHEST') then
    SendToModality(instanceId, 'pneumoscope')
  end
end
